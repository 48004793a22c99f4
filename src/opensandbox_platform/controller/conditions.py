"""metav1.Condition handling: both True and False are stored; lastTransitionTime moves on a change."""

from __future__ import annotations

from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import JSON


def set_condition(conditions: list[JSON], type_: str, status: bool, reason: str, message: str, generation: int) -> None:
    value = "True" if status else "False"
    for cond in conditions:
        if cond["type"] == type_:
            if cond["status"] != value:
                cond["lastTransitionTime"] = times.rfc3339()
            cond.update(status=value, reason=reason, message=message, observedGeneration=generation)
            return
    conditions.append(
        {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": times.rfc3339(),
            "observedGeneration": generation,
        }
    )


def same_status(old: JSON, new: JSON) -> bool:
    """Equal but for condition transition times: no write needed."""

    def strip(status: JSON) -> JSON:
        conds = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []]
        return {**status, "conditions": conds}

    return strip(old) == strip(new)
