from processor.main import main

raise SystemExit(main())
