"""How far to trust a map: faithfulness scores (:mod:`.faithfulness`) and localisation scores
against annotated boxes (:mod:`.localization`)."""
