"""Thin entry points for `ray job submit`: parse arguments, call the library."""
