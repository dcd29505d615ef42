"""The base layer: what every other part builds on, importing nothing of the project above it.

Errors (`errors.UserError`), the method interface (`interface`), config checking (`problems`),
PyTorch-exact optimiser pieces (`optim`), schedules, sharding (meshes, parameter rules), device
facts (`hardware`), command-line plumbing (`cli`, `huge_pages`).
"""
