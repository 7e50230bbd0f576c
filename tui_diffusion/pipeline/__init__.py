"""The torch side: model loading, sampling, node implementations, the executor and the worker.

Only the worker process imports this package's modules that import torch.
"""
