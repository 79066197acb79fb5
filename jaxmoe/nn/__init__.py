"""What model families share: tenancy (weight access), the MoE boundary, attention, norms, rotary."""
