"""CAPI (Darcet et al., 2025): cluster the EMA teacher's patches online, predict the clusters."""
