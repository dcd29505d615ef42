"""MIM-Refiner (Alkin et al., ICLR 2025): refine a MIM ViT's late blocks with nearest-neighbour
contrastive ID heads (heads, queue, loss, optimisation, views; the method class comes with the
ViT encoder)."""
