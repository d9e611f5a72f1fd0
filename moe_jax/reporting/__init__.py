"""What a person reads: terminal tables, Markdown reports and charts.

tables    print_models, print_hardware, print_placement, print_verification, print_run, print_analysis,
          print_plan (rich, on the console the CLI gives)
markdown  markdown (one analysed strategy), plan_markdown, baseline_markdown, compiled_by
charts    memory_chart, memory_chart_from (PNG)
rows      comparison_rows, dispatch_cells: cells the terminal and the Markdown share
"""
