"""Test hooks that production code loads only when their environment variable is set (MF2_TEST_FAULT)."""
