"""Three versions of one workflow, ``evolving``, one module each (as three deploys would have
them): ``v1``, ``v2`` (adds step b behind ``ctx.patched``), ``v3`` (``ctx.deprecate_patch``)."""
