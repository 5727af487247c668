"""The fault matrix runs in the same lab as the end-to-end tests."""

from ..e2e.conftest import lab  # noqa: F401  (the session-wide lab fixture)
