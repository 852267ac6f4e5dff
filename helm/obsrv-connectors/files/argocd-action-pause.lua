-- Argo CD resource action "pause" for obsrv.io/Connector: sets spec.state to Paused.
obj.spec.state = "Paused"
return obj
