"""Tools that work on finished runs rather than train: the sweep report, the fine-tuning of a whole sweep and the
export of an encoder for timm / the Hugging Face hub."""
