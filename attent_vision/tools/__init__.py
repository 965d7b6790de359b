"""Tools that work on finished runs rather than train: the sweep report and the fine-tuning of a whole sweep."""
