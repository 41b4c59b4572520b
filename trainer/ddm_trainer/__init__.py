"""The DDM trainer: every stage of the Decentralized Diffusion pipeline as a command.

Torch-free modules (importable by the operator): ``errors``, ``store``, ``layout``, ``configs``, ``progress``.
Everything else may import torch.
"""
