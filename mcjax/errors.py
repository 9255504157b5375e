"""Errors of stored state — training checkpoints (`mcjax.checkpoint`), params files
(`mcjax.assets`), session saves (`mcjax.runtime.persist`) and the nets resolved from them
(`mcjax.nets`): one base class, so the CLIs report every one of them the same way."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointMismatchError"]


class CheckpointError(RuntimeError):
    """A checkpoint, params file or save is missing, unreadable or does not fit."""


class CheckpointMismatchError(CheckpointError):
    """Stored params or state were written for a different architecture than the one asked
    for (base model, block structure, GistNet or LensNet)."""
