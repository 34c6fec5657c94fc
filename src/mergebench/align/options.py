"""What a head-aware aligner may leave in place: attention heads and residual streams.

`heads=identity` leaves every attention group as it is (the stream-only merge mergebench did before heads were
in the spec: a baseline); `residual=identity` leaves the residual streams (the embedding, norms, MLP in/out and
class head all read and write them), which Verma & Elbayad (2024) found best for text transformers. Both default to
`permute`.
"""

from __future__ import annotations

import dataclasses

from mergebench.errors import ConfigError
from mergebench.spec import PermutationSpec

CHOICES = ("permute", "identity")


@dataclasses.dataclass
class AttentionOptions:
    heads: str = "permute"  # permute | identity: attention heads aligned, or left as they are
    residual: str = "permute"  # permute | identity: residual streams aligned, or left as they are

    def check(self) -> None:
        for key in ("heads", "residual"):
            if getattr(self, key) not in CHOICES:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not known; allowed: {', '.join(CHOICES)}")

    def spec_for(self, spec: PermutationSpec) -> PermutationSpec:
        """The spec with the groups these options leave in place unmapped."""
        left = [*(spec.head_groups() if self.heads == "identity" else [])]
        left += spec.residual if self.residual == "identity" else ()
        return spec.without(left) if left else spec
