"""Test doubles that speak the real upstream protocols (see ``fake_upstream``)."""
