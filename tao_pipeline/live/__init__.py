"""Promotion on live traffic: the sequential decision, and the evidence it reads from served answers."""
