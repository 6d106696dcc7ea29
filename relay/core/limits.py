"""Limits shared by several layers, so each has one home."""

from __future__ import annotations

# What the relay keeps of a filename (Content-Disposition, signed links, event metadata):
# file systems and most clients stop at 255 characters.
MAX_FILENAME_LENGTH = 255
# RFC 6838 section 4.2: type and subtype names are at most 127 characters each.
MAX_CONTENT_TYPE_LENGTH = 255
