"""End-to-end fine-tuning of a pretrained ViT for classification (BEiT's / CAE v2's recipe)."""
