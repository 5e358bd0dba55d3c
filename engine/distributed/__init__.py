"""Collectives over torch.distributed (gloo on CPU, NCCL on CUDA): what the model's layers call
under tensor parallelism.  The processes themselves are started by engine/worker/tensor_parallel.py."""
