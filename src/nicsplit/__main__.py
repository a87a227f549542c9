from nicsplit.control.cli import main

raise SystemExit(main())
