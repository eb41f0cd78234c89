"""Compatibility paths of the UntangleAI tutorial (``untangle_ext.external.signal_api._attribute``)."""
