"""Slide and patient reports: measure run folders, draw a thumbnail with overlays, and
write a self-contained HTML page, a PDF and a JSON record (see `job.report_job`)."""

from .content import Report, ReportOptions
from .job import ReportProgress, ReportRequest, ReportResult, make_report, report_job, up_to_date

__all__ = [
    "Report",
    "ReportOptions",
    "ReportProgress",
    "ReportRequest",
    "ReportResult",
    "make_report",
    "report_job",
    "up_to_date",
]
