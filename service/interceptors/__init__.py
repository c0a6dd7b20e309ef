"""Server interceptors, one file each, applied outermost first:

1. :mod:`.audit` — one chained record per call, written before the answer leaves
   (fail closed);
2. :mod:`.auth` — who is calling (bearer token / client certificate) and whether their
   role has the method's right;
3. :mod:`.limits` — calls per second and concurrent calls per principal.

They share the call's :class:`~service.interceptors.call.CallInfo` (principal, request
id, facts for the audit record) through a context variable; the servicer reads the
principal with :func:`current_principal` and adds facts with :func:`add_facts`.
"""

from __future__ import annotations

from service.interceptors.call import CallInfo, add_facts, current_call, current_principal

__all__ = ["CallInfo", "add_facts", "current_call", "current_principal"]
