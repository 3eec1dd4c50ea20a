from mistral_ref.cli import main

raise SystemExit(main())
