"""Backbones and the layers they share: CAPI's EncoderDecoder (`encoder_decoder.py`)."""
