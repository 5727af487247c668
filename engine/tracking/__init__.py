"""Dirty-page trackers for pre-copy: which pages changed since they were sent."""
