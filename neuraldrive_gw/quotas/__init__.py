"""Quotas (SPEC §8): token buckets, budgets, the fair model queue, and admission over them."""

from __future__ import annotations

from .admission import Admission, Limits, Ticket, key_limits, tenant_limits
from .budgets import BudgetLedger, Reservation, Scope, format_reset, period_key, reset_time
from .buckets import TokenBucket
from .fairqueue import FairQueue, Slot
from .ratelimit import openai_duration

__all__ = ["Admission", "BudgetLedger", "FairQueue", "Limits", "Reservation", "Scope", "Slot",
           "Ticket", "TokenBucket", "format_reset", "key_limits", "openai_duration",
           "period_key", "reset_time", "tenant_limits"]
