"""Dock widgets: the only package that imports Qt and magicgui."""
