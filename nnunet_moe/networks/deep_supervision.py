"""The deep-supervision switch of our decoders: ``decoder.deep_supervision``, as nnU-Net sets it.

nnU-Net's ``set_deep_supervision_enabled`` assigns ``network.decoder.deep_supervision``. A decoder that
mixes this in holds its extra heads in ``heads`` (``None`` when built without deep supervision, so it
has none of their parameters) and names its network in ``network_name`` for the error message.
"""
from __future__ import annotations


class DeepSupervisionSwitch:
    """``deep_supervision``: True -> the network returns one logits tensor per deep-supervision scale (its
    ``deep_supervision_factors()``), False -> one tensor. Cannot be switched on without ``heads``."""

    network_name = "network"  # heads: set by the decoder (a class default would hide nn.Module's registered heads)

    @property
    def deep_supervision(self) -> bool:
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        if enabled and self.heads is None:
            raise ValueError(
                f"this {self.network_name} was built with deep_supervision=False and has no deep-supervision "
                "heads; construct it with deep_supervision=True to switch deep supervision on")
        self._deep_supervision = bool(enabled)
