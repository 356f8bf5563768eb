"""pop3sf: a POP3 server framework whose mailboxes come from adapters."""

__version__ = "2.0.0"
