"""The leaderboard report: records -> tables (markdown, CSV, LaTeX) and figures.

Reads stored result records only; never imports method code or torch.
"""

from .collect import RecordSet, load_records, records_frame
from .page import Section, build
from .published import Published, load_published

__all__ = ["Published", "RecordSet", "Section", "build", "load_published", "load_records", "records_frame"]
