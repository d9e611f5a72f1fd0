"""What a person reads: Markdown reports and charts."""
