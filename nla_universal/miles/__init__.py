"""The Miles extension: joint RL of the AV and AR with Miles (radixark/miles, pinned in miles_patches/).

Thin adapters over the core; the RL arithmetic is `train/rl_math.py`'s and the NLA path the bundle's:

    --data-source-path                 data_source.NLADataSource   run folder activations -> Sample groups
    --custom-generate-function-path    generate.generate            AV.prompt_embeds -> SGLang /generate (input_embeds)
    --custom-rm-path                   reward.reward                −mse_nrm from the AR critic (rl_math.reward)
    --custom-reward-post-process-path  reward.post_process          rl_math.group_advantages per group
    --train-backend fsdp               actor.NLAPolicyActor         (rebinding by miles_patches.apply())
    (no Miles flag)                    critic.MilesCriticHost       the AR, a named Ray actor of ours
    python -m nla_universal.miles.train                             the driver (Miles' train.py flow + the AR)

Importing this package imports nothing of Miles; its modules do (run them where Miles is installed).
See README.md beside this file.
"""
