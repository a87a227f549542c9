from nicsplit.cli.main import main

raise SystemExit(main())
