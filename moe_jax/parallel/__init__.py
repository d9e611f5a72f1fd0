"""The parallel strategy and how it meets devices: `Strategy` and the mesh, the logical-axis rules, fake CPU devices."""
