"""Backbones and the parts they share: `layers` (attention, MLP, norms, drop path, FSDP gathering
and remat policies), `stack` (the one block stack), CAPI's EncoderDecoder (`encoder_decoder.py`),
the standard ViT of MAE / data2vec 2.0 / CAE v2 / CLIP (`vit.py`; its converters in
`weights/vit.py`)."""
