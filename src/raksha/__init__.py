"""Raksha: data protection as a service for KVM clouds."""

__version__ = "0.1.0"
