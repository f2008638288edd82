"""Sparse CPU kernels: SparseProp's training kernels and the layers that use them."""
