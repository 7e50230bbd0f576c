from tui_diffusion.cli import main

raise SystemExit(main())
