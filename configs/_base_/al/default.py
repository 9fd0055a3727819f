# The active-learning block every task config inherits; override with --cfg-options,
# e.g. --cfg-options al.budget=40 al.seeds="[0,1]".
al = dict(
    # Registered strategy names or config dicts; a dict may carry `name`, its label in
    # results. `random` is always run as the baseline.
    strategies=[
        "random",
        "entropy",
        dict(type="bald", n_samples=20),
        dict(type="ensemble_kl", name="ensemble"),
        "llal",
        "coreset",
        "badge",
        dict(
            type="two_stage",
            name="hybrid",
            first=dict(type="entropy"),
            second=dict(type="coreset"),
            candidates_factor=5,
        ),
        dict(
            type="two_stage",
            name="llal+coreset",
            first=dict(type="llal"),
            second=dict(type="coreset"),
            candidates_factor=5,
        ),
    ],
    initial=20,  # initial random labeled set
    budget=20,  # labels bought per round
    rounds=10,  # selection rounds
    seeds=[0, 1, 2, 3, 4],
    ensemble_size=5,  # members trained for ensemble strategies
    # LLAL: the gradient into the model stops after 60 % of the schedule (the paper's 120/200).
    llal=dict(weight=1.0, margin=1.0, stop_grad_fraction=0.6, hidden=128),
)
