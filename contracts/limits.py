"""Size limits every process on the wire agrees on."""

from __future__ import annotations

MAX_INBOX_RECORD_BYTES = 512 * 1024
"""The largest record a node handles on its inbox (a start, signal, cancel or activity reply):
half of librdkafka's default ``message.max.bytes``, so that what a record leads to (its history
event, an activity command with its input, a result) still fits in one record. Clients refuse a
larger start, signal or cancel (``PayloadTooLarge``); a service turns a larger reply into a
business failure ``PayloadTooLarge``; a node gives a larger start a FAILED result (``Oversized``)
and fails the attempt of a larger reply."""
