"""Running livecam as a systemd user service: the unit, and the sd_notify protocol."""
