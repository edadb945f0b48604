"""The handle a monkey-patch of a peer library's method returns (compat.patch_sparsify,
compat.patch_saelens)."""
from __future__ import annotations


class MethodPatch:
    """``remove()`` (or leaving a ``with`` block) puts ``owner.<name>`` back as it was: the
    previous attribute of the class or instance, or none at all for an instance that had no
    attribute of its own."""

    name = "forward"  # the patched attribute

    def __init__(self, owner, previous):
        self._owner, self._previous = owner, previous

    def remove(self):
        if self._owner is None:
            return
        if self._previous is None:
            delattr(self._owner, self.name)
        else:
            setattr(self._owner, self.name, self._previous)
        self._owner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
