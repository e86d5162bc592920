"""Modules built on moestream's ops (own parameters, call :mod:`moestream.ops`)."""

from .moe import ROUTING_PRESETS, GroupedExperts, MoE, Router, Routing, SharedExpert

__all__ = ["ROUTING_PRESETS", "GroupedExperts", "MoE", "Router", "Routing", "SharedExpert"]
