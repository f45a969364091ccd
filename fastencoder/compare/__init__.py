"""`fastencoder compare`: BERT against ALBERT, pretrained and fine-tuned on the same data."""
