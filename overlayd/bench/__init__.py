"""`overlayd bench`: overlayd's data paths against the kernel's VXLAN on one two-host testbed.

Two namespaces joined by one veth pair (the underlay, MTU 1500); every subject puts an overlay
with inner MTU 1450 across it, and the same measurements run over each, in one run, so the
figures compare as ratios (the machine is noisy; absolute numbers are not the point).
"""
