"""Pictures of a run, drawn while it trains: ``drawing`` (the shared helpers and callback base), ``pretraining``
(MultiMAE reconstructions, the AtteNT teacher's selection galleries) and ``finetuning`` (prediction galleries, the
confusion matrix)."""
