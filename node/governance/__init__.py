"""Model governance: what a hospital's AI committee does before and after it
switches a model on (issue #13).

- `labels`: labelled sets (a CSV with one 0/1 column per pathology, or NIH
  ChestX-ray14's Data_Entry_2017.csv);
- `metrics`: AUROC with bootstrap CIs, sensitivity/specificity/PPV/NPV at the
  operating point, calibration (ECE, reliability), agreement (kappa);
- `scoring`: a labelled set scored through the pipeline's own decoding,
  preprocessing and engine;
- `evaluate` and `report`: `carina eval`'s JSON, HTML report and registry record;
- `calibrate`: new operating points for target sensitivities/specificities;
- `finetune`: a candidate trained from a parent on a labelled set, compared
  with it on a held-out split (the registry's activation guard reads that);
- `cli`: the `carina eval`, `carina model ...` and `carina feedback ...` commands.

Shadow mode and radiologist feedback live in node/shadow.py and node/feedback.py.
"""
