"""phaul: live migration of Linux process trees and containers on top of CRIU."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
