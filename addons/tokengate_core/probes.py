"""What the quota service reports as it works, for whoever watches it (the Metrics addon).

The gate holds one `Probes`; this one ignores everything, so the quota service calls it
unconditionally at the cost of a method call, and the Metrics addon puts a recording one in
its place while metrics are served.
"""

from __future__ import annotations


class Probes:
    def store_call(self, operation: str, seconds: float, answered: bool) -> None:
        """One call to the usage store ('reserve', 'settle' or 'release') took `seconds`;
        `answered` is False when the store could not be reached."""

    def queue_wait(self, seconds: float, admitted: bool) -> None:
        """A request waited `seconds` for in-flight reservations, then was admitted or not."""
