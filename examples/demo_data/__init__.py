"""The demo's content, as plain Python data: the Kestrel Cycles facts and the general-knowledge probe.

Each fact: key, one canonical answer, five training phrasings, one held-out test phrasing (worded the way a
different user would ask, not a synonym swap of a training phrasing). The order of `FACTS` is part of the output:
it fixes the test row ids and, with the seed, the training rows' shuffle. Everything about Kestrel Cycles is invented.
"""

from .buying_and_extras import BUYING_AND_EXTRAS
from .probe import PROBE
from .repair_and_delivery import REPAIR_AND_DELIVERY
from .visit_and_rent import VISIT_AND_RENT

FACTS: list[dict] = [*VISIT_AND_RENT, *REPAIR_AND_DELIVERY, *BUYING_AND_EXTRAS]

__all__ = ["FACTS", "PROBE"]
